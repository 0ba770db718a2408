"""What a run reports: MLflow tracking, result tables, plots and the results matrix."""
