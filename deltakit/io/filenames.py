"""The file names of the checkpoint layouts deltakit reads (Hugging Face, PEFT), in one place.

Both the local reader (:mod:`deltakit.io.checkpoint`) and the Hub resolver (:mod:`deltakit.io.hub`)
choose files by these names; neither imports the other for them.
"""

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ADAPTER_CONFIG = "adapter_config.json"
ALLOW_PICKLE_FLAG = "allow_pickle=True (--allow-pickle)"  # Python and CLI spelling; the CLI keeps the flag
DIFFUSERS_WEIGHTS_PREFIX = "diffusion_pytorch_model"  # a diffusers component's weights: <prefix>.safetensors (+ index)
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline folder: one subfolder per component
