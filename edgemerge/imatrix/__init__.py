"""Importance matrices (imatrix): their files in llama.cpp's formats (`files`), the weights llama-quantize derives
from them, and computing them in llama.cpp on calibration text (`collect`)."""

from .files import Entry, Imatrix, check_fits, importance, read_imatrix, write_imatrix

__all__ = ["Entry", "Imatrix", "check_fits", "importance", "read_imatrix", "write_imatrix"]
