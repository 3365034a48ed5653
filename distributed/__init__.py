"""tunefleet.distributed: the SFT entrypoint and what runs inside the training processes."""
