"""Triton kernels, installed as ``avgn_fast.kernels``: one op per file (launcher, reference, registration).

Importing this package registers ``torch.ops.avgn_fast.crop_patches`` and ``torch.ops.avgn_fast.av_attention``
(``import avgn_fast`` imports it), and exports each file's launcher and reference. The names below are the
functions: ``avgn_fast.kernels.crop_patches`` is the launcher, while ``from avgn_fast.kernels.crop_patches
import ...`` still reads the file of that name.
"""

from avgn_fast.kernels.av_attention import av_attention, av_attention_ref
from avgn_fast.kernels.crop_patches import crop_patches, crop_patches_ref

__all__ = ["av_attention", "av_attention_ref", "crop_patches", "crop_patches_ref"]
