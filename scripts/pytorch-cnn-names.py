#!/usr/bin/env python3
"""Write the state_dict names and shapes of the anchor's LeNet-5 and ResNet-20
(../shared/anchors/pytorch_cnn.py) as tests/data/pytorch_cnn_state_dict.txt: one line per tensor,
"MODEL NAME SHAPE" (SHAPE as comma-separated sizes, "-" for a scalar). The Rust test
`tests/cnn.rs` compares the presets' layouts with it. Needs PyTorch:

  python3 scripts/pytorch-cnn-names.py ../shared/anchors > tests/data/pytorch_cnn_state_dict.txt
"""
import sys

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "../shared/anchors")
import pytorch_cnn  # noqa: E402

for name, model in (("lenet5", pytorch_cnn.lenet5()), ("resnet20", pytorch_cnn.resnet20(10))):
    for k, v in model.state_dict().items():
        shape = ",".join(str(d) for d in v.shape) or "-"
        print(f"{name} {k} {shape}")
