"""flambeau testing."""
