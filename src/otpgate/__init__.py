"""otpgate: self-hosted OTP authentication speaking Alipay's signed global API protocol."""

__version__ = "0.1.0"
