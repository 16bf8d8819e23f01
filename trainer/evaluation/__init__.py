"""What the loop measures besides the training loss: validation (`evaluator`), downstream
lm_eval tasks during training (`downstream`, through `lm_eval_runner`, with the local tasks in
`tasks/`), depth diagnostics (`diagnostics`), and where time and memory go (`profiling`)."""
