"""The shared engine behind the workers: Redis, spoken through one adapter."""

from rtc.broker.base import Broker, BrokerHandler, SlotTaken
from rtc.broker.cluster import ClusterBroker
from rtc.broker.redis import LOST, RedisBroker
from rtc.config import Settings

__all__ = ["LOST", "Broker", "BrokerHandler", "ClusterBroker", "RedisBroker", "SlotTaken", "make_broker"]


def make_broker(settings: Settings, handler: BrokerHandler, worker: str) -> Broker:
    """The broker for the configured Redis: a cluster, a URL, or the embedded server's socket."""
    if settings.redis_cluster:
        return ClusterBroker(settings.redis_cluster, handler, worker)
    if settings.redis_url:
        return RedisBroker(settings.redis_url, handler, worker)
    assert settings.runtime_dir is not None, "the supervisor sets the embedded Redis URL"
    return RedisBroker(f"unix://{settings.runtime_dir}/redis.sock", handler, worker)
