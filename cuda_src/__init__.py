"""Raw CUDA C sources, shipped as package data `aircupy.cuda_src` (found with importlib.resources)."""
