from sslscale.models.backbones import ResNetTrunk, build_trunk
from sslscale.models.multicrop import encode_crops

__all__ = ["ResNetTrunk", "build_trunk", "encode_crops"]
