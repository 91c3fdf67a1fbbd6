"""Sample SDXL, SSD-1B, SD 1.5 or SD 2.1 (+ DreamBooth LoRA) or DeepFloyd IF images from the command line, with
MindONE's flags:

    python demo/sampling_without_streamlit.py --task txt2img --config configs/inference/sd_xl_base.yaml \
        --weight checkpoints/sd_xl_base_1.0_ms.ckpt,runs/.../SDXL-base-1.0_1000_lora.ckpt \
        --prompt "a sks dog swimming in a pool" --device_target CPU

`--prompt` may be a .txt file (one prompt per line). Images and a grid PNG go to --save_path. The size defaults to
the config's `native_resolution` (SDXL/SSD-1B 1024, SD 2.1 768, SD 1.5 and SD 2.1-base 512); the size-conditioning
flags (--orig_width, --crop_coords_top, --sd_xl_base_ratios, ...) are for SDXL/SSD-1B only.

DeepFloyd IF is picked from the config (its network is IFUNet): --config/--weight stage I (64x64), and
--stage2_config/--stage2_weight stage II (256x256); stage III is not supported (mindbooth/if_sampling.py):

    python demo/sampling_without_streamlit.py --config configs/inference/if_i_xl.yaml --weight checkpoints/if_i_xl.ckpt \
        --stage2_config configs/inference/if_ii_l.yaml --stage2_weight checkpoints/if_ii_l.ckpt --prompt "a corgi"
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindbooth.allocator import preload_mimalloc  # noqa: E402

if __name__ == "__main__":
    preload_mimalloc()  # on CPU: re-executes this script with mimalloc preloaded (mindbooth/allocator.py)

from mindbooth.sampling_cli import main  # noqa: E402  (imports MindSpore)

if __name__ == "__main__":
    main()
