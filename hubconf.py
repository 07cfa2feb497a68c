"""torch.hub entry points: the ResNet-50 trunk of each released recipe, with weights from a local file.

    trunk = torch.hub.load("path/to/sslscale", "dissl_resnet50_d8192_e800_m8", source="local",
                           weights="dissl_resnet50_d8192_e800_m8.pt")
    features = trunk(images)  # [B, 8192]

Nothing is downloaded: `weights` is a file in the published layout (torchvision key names without
fc.*, plus resizer.* for d8192), as the authors published them or as `sslscale export` writes them.
Without `weights` the trunk is randomly initialised. The file must fit the entry (a d2048 file into
a d8192 entry is refused, naming the tensors that differ).
"""
dependencies = ["torch", "torchvision"]  # torch.hub puts this folder on sys.path while an entry runs

# name -> representation dimension (None: the trunk's own 2048); one entry per configs/<name>.yaml.
RELEASED = {
    "dissl_resnet50_dNone_e100_m2": None,
    "dissl_resnet50_d8192_e100_m2": 8192,
    "dissl_resnet50_d8192_e100_m6": 8192,
    "dissl_resnet50_dNone_e400_m2": None,
    "dissl_resnet50_dNone_e400_m6": None,
    "dissl_resnet50_d8192_e400_m6": 8192,
    "dissl_resnet50_d8192_e800_m8": 8192,
    "cissl_resnet50_e100_m2": None,
}


def _entry(name: str, dim):
    def build(weights: str | None = None):
        from sslscale.checkpoint.trunk_file import load_state, read_trunk_file
        from sslscale.models.backbones import ResNetTrunk
        trunk = ResNetTrunk("resnet50", width=64, dim=dim, small_image_stem=False)
        if weights is not None:
            state, _ = read_trunk_file(weights)
            load_state(trunk, state, f"{weights} (for {name})")
        return trunk.eval()
    build.__name__ = name
    build.__doc__ = (f"ResNet-50 trunk of {name}: features of dimension {dim or 2048}. weights: a local file in "
                     "the published layout (nothing is downloaded); None for a random initialisation.")
    return build


for _name, _dim in RELEASED.items():
    globals()[_name] = _entry(_name, _dim)
