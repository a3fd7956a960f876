"""The deployment core: the folder format, the task type, the architecture table and the computation shared by
the export and the torch backend. Both promptmux.export and promptmux.runtime build on it; it imports neither."""
