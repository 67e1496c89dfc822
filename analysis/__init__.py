"""Probes of the study over models x layers, as Ray tasks, with tables, figures and MLflow logging.

Modules, from the inside out:
- `probes`: the probes as pure functions of arrays (norms, attention, correspondence, neighbours, global and
  local information, representation quality, removal effect); `segmentation`: heads and mIoU, pure torch.
- `data`: CIFAR-10, ADE20K, image-folder and generated-image readers; `specs`: which models, and loading them.
- `extract`: model-facing helpers (attention rows of chosen queries, token samples).
- `tasks`: one model x probe group (x layer chunk) from one pass, no Ray; `runner`: the Ray fan-out and MLflow;
  `report` and `figures`: CSV, PNG and the claim-by-claim summary; `run_probes`: the command line.
"""
