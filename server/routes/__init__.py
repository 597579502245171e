"""HTTP routes, one router per resource: thin layers that parse, call the repository, and encode."""
