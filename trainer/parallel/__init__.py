"""Everything distributed: ranks and process groups (`dist`, the only module that calls
torch.distributed), Ulysses sequence parallelism (`ulysses`), the DeepSpeed engine built from
our config (`engine`), the optimizer and its parameter groups (`optim`), and every DeepSpeed
internal we rely on (`ds_state`)."""
