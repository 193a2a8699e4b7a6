"""The checkpoint layout: each engine's files, the DeepSpeed and HF key maps, reading a folder's weights."""
