"""The shared engine behind the workers: Redis, spoken through one adapter."""

from rtc.broker.base import Broker, BrokerHandler, SlotTaken
from rtc.broker.redis import RedisBroker

__all__ = ["Broker", "BrokerHandler", "RedisBroker", "SlotTaken"]
