"""quantarena: quantize an LLM every way, measure what each costs, and pick the scheme for your GPU and traffic."""
__version__ = "0.1.0"
