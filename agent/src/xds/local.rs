//! Local mode: the mesh described in a YAML file. (stub: being written)
