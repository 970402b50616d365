"""Benchmarks of the engine against `transformers` (`pipeline bench engine`). Importing this
package imports nothing heavy; the modules import torch and, when run, transformers."""
