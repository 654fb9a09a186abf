"""azure-core credentials whose Dynamics 365 access tokens come from the Dynamics Token Broker.

>>> from dynamics_token_broker_client import BrokerCredential
>>> credential = BrokerCredential("http://token-broker:8080", "default", key_file="/run/secrets/broker-key")
>>> DataverseClient("https://contoso.crm.dynamics.com", credential)  # doctest: +SKIP
"""

from ._async import AsyncBrokerCredential
from ._common import BrokerAuthenticationError, BrokerUnavailableError, __version__
from ._sync import BrokerCredential

__all__ = [
    "AsyncBrokerCredential",
    "BrokerAuthenticationError",
    "BrokerCredential",
    "BrokerUnavailableError",
    "__version__",
]
