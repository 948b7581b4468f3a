"""The data path: the shard format (the contract with data_prep) and, later, the loaders."""
