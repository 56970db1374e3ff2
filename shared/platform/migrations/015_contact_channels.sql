-- Every address a contact has, and what audiences need to find contacts fast.

-- Channel addresses next to email and phone: WhatsApp (E.164), a Telegram chat id, push tokens
-- (a device each), and the contact's IANA time zone. A constant default adds no table rewrite.
ALTER TABLE contacts ADD COLUMN timezone text,
                     ADD COLUMN whatsapp text,
                     ADD COLUMN telegram_chat_id text,
                     ADD COLUMN push_tokens text[] NOT NULL DEFAULT '{}';

-- A segment's or a multi-list audience's snapshot walks the tenant's contacts in id order
-- ("contacts of tenant T after id X"); without it that walk would read every tenant's contacts.
CREATE INDEX contacts_tenant_id ON contacts (tenant_id, id);
-- Imports merge rows without an external id by email, and GET /v1/contacts?email= filters by it.
CREATE INDEX contacts_tenant_email ON contacts (tenant_id, lower(email)) WHERE email IS NOT NULL;
