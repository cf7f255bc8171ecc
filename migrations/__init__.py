"""kipam's SQL migrations: ``NNNN_description.sql``, applied in order by ``kipam migrate``."""
