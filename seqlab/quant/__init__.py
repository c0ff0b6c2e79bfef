"""Weight quantization of seqlab models (issue 20): AQLM additive multi-codebook quantization, with
round-to-nearest and a GPTQ-style second-order method as baselines, calibrated on real activations."""
