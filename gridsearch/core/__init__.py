"""The leaf layer: small mechanisms every other package uses, each written once here.

Nothing in ``core`` imports the rest of gridsearch (an import-linter contract pins it)."""
