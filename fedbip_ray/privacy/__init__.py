"""Client-level differential privacy: accounting of the privacy spent (Google's dp-accounting)."""

from .accounting import dp_epsilon, privacy_report

__all__ = ["dp_epsilon", "privacy_report"]
