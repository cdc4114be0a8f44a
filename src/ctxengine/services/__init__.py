"""Business rules, one module per area of the contract; one unit of work per public call."""
