"""The tooling's own tests act as the admin (DB user `todo`, Redis user `default`, with the generated
local secrets), as the product's tests do; they need nothing else from the product's test fixtures."""

from tools import credentials

credentials.use_admin()
