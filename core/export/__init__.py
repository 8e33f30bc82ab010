"""Export: write a trained model in a deployment format and prove the file against its source."""
