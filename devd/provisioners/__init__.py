"""Resource provisioners: one per kind of resource, all behind the contract in base.py."""

from devd.provisioners.base import Context, Health, Progress, Provisioner
from devd.provisioners.deps import DepsProvisioner
from devd.provisioners.dirs import DirsProvisioner
from devd.provisioners.envfile import EnvFileProvisioner
from devd.provisioners.ports import PortsProvisioner
from devd.provisioners.postgres import PostgresProvisioner


def default_provisioners() -> list[Provisioner]:
    """In provisioning order; the env file comes last because it writes everyone's variables."""
    return [PortsProvisioner(), DirsProvisioner(), PostgresProvisioner(), DepsProvisioner(),
            EnvFileProvisioner()]


__all__ = ["Context", "Health", "Progress", "Provisioner", "default_provisioners"]
