"""metatrain: config-driven gradient-based meta-learning (MAML, FOMAML, MAML++,
Reptile, ANIL, Meta-SGD).

A regular package, not a namespace one: with two checkouts on one path, Python
would otherwise merge their metatrain/ folders module by module.
"""
