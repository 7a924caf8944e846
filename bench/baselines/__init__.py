"""Servers rtc is measured against; each speaks what the load generator needs."""
