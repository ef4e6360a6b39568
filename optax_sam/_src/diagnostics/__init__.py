"""The diagnostics room: Hessian products, Lanczos, trace, spectrum, SAM and adaptive sharpness."""
