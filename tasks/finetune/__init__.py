"""Fine-tune datasets: examples from annotations, checks, the build, the upload."""
