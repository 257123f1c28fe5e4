"""Resource provisioners: one per kind of resource, all behind the contract in base.py.

The kinds import this package's base; the order they run in is the handlers' business
(devd/handlers/core.py: default_provisioners), so nothing here imports a kind.
"""

from devd.provisioners.base import Context, Health, Progress, Provisioner

__all__ = ["Context", "Health", "Progress", "Provisioner"]
