"""Model families behind one interface: each family's loading, conditioning, objective and exports."""
