"""``freesolo import-weights``: published SOLOv2 / FreeSOLO checkpoints and ResNet backbones as this project's
checkpoints. ``core`` maps tensor names and checks them; one module per source layout knows its names and reads its
architecture from the tensors; ``command`` is the CLI."""
