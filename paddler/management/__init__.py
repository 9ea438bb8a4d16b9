"""The management API (Klein): upstreams, drain/undrain, agent reports."""
