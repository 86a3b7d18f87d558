"""Client texts for federated fine-tuning: synthetic, local files, HF datasets, Shakespeare.

``build_federated_texts`` gives every client's train/test split plus the public and
central-test texts; ``load_client_split`` is what a ClientApp calls for its partition and
``central_test_texts`` what the server evaluates on.
"""

from fedslm.data.core import ClientSplit, DataError, FederatedTexts
from fedslm.data.federated import build_federated_texts, central_test_texts, load_client_split, root_texts
from fedslm.data.synthetic import synthetic_public_corpus

__all__ = [
    "ClientSplit",
    "DataError",
    "FederatedTexts",
    "build_federated_texts",
    "central_test_texts",
    "load_client_split",
    "root_texts",
    "synthetic_public_corpus",
]
