"""Edit data: record readers (sources/), validation and quarantine, images, the environment shards and their
schemas, pre-edit references, and the case source a stream reads."""
