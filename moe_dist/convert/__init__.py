"""Conversion: stock transformers classes to and from our config and tensors, stock-class import with its
exactness check, starting weights read lazily under our names, and sparse upcycling."""
