"""llc_bench: Local Learning Coefficient estimation benchmark."""
