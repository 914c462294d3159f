"""The Dify ``.difypkg`` format: reading and verifying a package, its identifier and checksum,
its manifest and declaration, safe extraction, building and signing.

Nothing here runs a plugin or touches Redis or Postgres; ``plugind.runtime`` runs what this
package has verified and unpacked.
"""

from plugind.package._manifest import parse_yaml
from plugind.package.difypkg import (
    PluginPackage,
    build_package,
    dify_checksum,
    install_dir,
    parse_identifier,
    read_package,
)
from plugind.package.extract import extract
from plugind.package.signature import load_public_keys, sign_package, verify_signature

__all__ = [
    "PluginPackage",
    "build_package",
    "dify_checksum",
    "extract",
    "install_dir",
    "load_public_keys",
    "parse_identifier",
    "parse_yaml",
    "read_package",
    "sign_package",
    "verify_signature",
]
