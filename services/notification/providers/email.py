"""Email through an SMTP relay, with the standard library's ``smtplib`` run off the event loop.

One connection per message: EHLO, STARTTLS (or implicit TLS) with certificate checks, AUTH when
credentials are configured, then the message. Reply codes decide what happens next: 4xx and lost
connections are retried later, 5xx are final (RFC 5321 section 4.2.1). The Message-ID derives
from the notification, so a retried message is recognisably the same one.
"""

from __future__ import annotations

import asyncio
import html
import smtplib
import ssl
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

from services.notification.providers import SendResult

FOOTER = "You receive this because email notifications are on in your FitTracker settings."


@dataclass(frozen=True)
class Email:
    """One message to one recipient."""

    to_address: str
    to_name: str
    subject: str
    text: str
    #: Unique per notification, e.g. "n1b2c3@fittracker.app" (without angle brackets).
    message_id: str
    #: The notification's resource name, for support and for mail filters.
    reference: str


class EmailProvider:
    """Sends email through the configured relay."""

    def __init__(
        self, host: str, port: int, security: str, username: str, password: str, sender: str, timeout: float
    ) -> None:
        """Relay through ``host:port`` with ``security`` ("starttls", "tls" or "none") as ``sender``."""
        self._host = host
        self._port = port
        self._security = security
        self._username = username
        self._password = password
        self._sender = sender
        self._timeout = timeout
        self._context = ssl.create_default_context()

    def compose(self, email: Email) -> EmailMessage:
        """The MIME message: plain text with an HTML alternative."""
        message = EmailMessage()
        message["From"] = self._sender
        message["To"] = Address(display_name=email.to_name, addr_spec=email.to_address)
        message["Subject"] = email.subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = f"<{email.message_id}>"
        # RFC 3834: tells auto-responders not to answer a machine-sent message.
        message["Auto-Submitted"] = "auto-generated"
        message["X-FitTracker-Notification"] = email.reference
        message.set_content(f"{email.text}\n\n--\n{FOOTER}\n")
        message.add_alternative(
            f"<p>{html.escape(email.text)}</p><hr><p><small>{html.escape(FOOTER)}</small></p>", subtype="html"
        )
        return message

    async def send(self, email: Email) -> SendResult:
        """Hand the message to the relay."""
        message = self.compose(email)
        try:
            await asyncio.to_thread(self._deliver, message)
        except smtplib.SMTPRecipientsRefused as refused:
            code, reply = next(iter(refused.recipients.values()))
            return _by_code(code, reply)
        except smtplib.SMTPResponseException as error:
            return _by_code(error.smtp_code, error.smtp_error)
        except (smtplib.SMTPException, OSError) as error:
            return SendResult.retry(f"SMTP relay unreachable: {error!r}")
        return SendResult.accepted()

    def _deliver(self, message: EmailMessage) -> None:
        client: smtplib.SMTP
        if self._security == "tls":
            client = smtplib.SMTP_SSL(self._host, self._port, timeout=self._timeout, context=self._context)
        else:
            client = smtplib.SMTP(self._host, self._port, timeout=self._timeout)
        with client:
            client.ehlo()
            if self._security == "starttls":
                client.starttls(context=self._context)
                client.ehlo()
            if self._username:
                client.login(self._username, self._password)
            client.send_message(message, from_addr=parseaddr(self._sender)[1])


def _by_code(code: int, reply: bytes | str) -> SendResult:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    if 400 <= code < 500:
        return SendResult.retry(f"SMTP {code} {text}")
    return SendResult.refused(f"SMTP {code} {text}")
