"""Every record and metric key that crosses the wire, in one place.

Client and server both import these names; a key spelled twice is a key that can
drift. Flower's FedAvg weights by ``num-examples`` (``WEIGHT_KEY``).
"""

from __future__ import annotations

# Records of a message's RecordDict
ARRAYS_KEY = "arrays"  # the adapter (or its compressed delta)
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
STATUS_RECORD = "status"  # a ConfigRecord a client sends instead of an update

# Keys of the server's config record
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
PARTITION_ID = "partition-id"  # also a metric key: who replied, in simulation

# Keys of a status record
STATUS_KEY = "status"
BUDGET_EXHAUSTED = "budget-exhausted"

# Metric keys every reply carries
WEIGHT_KEY = "num-examples"
