"""otpgate: a self-hosted OTP authentication service speaking Alipay's signed global API protocol."""

__version__ = "0.1.0"
