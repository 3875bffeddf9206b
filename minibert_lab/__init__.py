"""A literate research lab for small BERT-style encoders and their attention mechanisms (torch and JAX)

Modules:

- `minibert_lab.heads`: Fine-tuning heads on any encoder: pooling, one loss per problem type written once against the array API (so torch and JAX run the same math), calibration, and scikit-learn metrics with bootstrap intervals."""

__version__ = "0.1.0"
