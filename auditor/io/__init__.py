"""Inputs: sample sources and pixel decoding (no torch), the torch dataset, and model loading."""
