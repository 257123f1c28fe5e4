"""Resource provisioners: one per kind of resource, all behind the contract in base.py."""

from devd.provisioners.base import Context, Health, Progress, Provisioner
from devd.provisioners.deps import DepsProvisioner
from devd.provisioners.dirs import DirsProvisioner
from devd.provisioners.envfile import EnvFileProvisioner
from devd.provisioners.ports import PortsProvisioner
from devd.provisioners.postgres import PostgresProvisioner


def default_provisioners() -> list[Provisioner]:
    """In provisioning order. The env file follows everything that exports variables; deps
    export none and can take minutes, so they come after it and the .env is ready at once."""
    return [PortsProvisioner(), DirsProvisioner(), PostgresProvisioner(), EnvFileProvisioner(),
            DepsProvisioner()]


__all__ = ["Context", "Health", "Progress", "Provisioner", "default_provisioners"]
