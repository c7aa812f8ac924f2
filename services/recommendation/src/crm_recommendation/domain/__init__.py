"""Pure domain of the recommendation service: values (``model``) and ranking."""
