"""Model export: DELF/DELG SavedModels with the official signatures."""
